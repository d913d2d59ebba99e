// Idempotent replica-set initiation for the compose stack (run by the one-shot `mongo-init`
// service on every `docker compose up`): initiates `rs0` with a single member the first time,
// does nothing afterwards, then waits until that member is a writable primary.
// Credentials come from the environment (never from argv, where `ps` would show them).

const replicaSet = process.env.MONGO_REPLICA_SET || "rs0";
const memberHost = process.env.MONGO_REPLICA_HOST || "mongo:27017";
const admin = db.getSiblingDB("admin");
admin.auth(process.env.MONGO_ROOT_USERNAME, process.env.MONGO_ROOT_PASSWORD);

// A failed command throws in mongosh. Keep try/catch at the top level: mongosh's async rewriting
// does not catch server errors thrown inside a helper function (tested with mongosh 2.x).
let status;
try {
  status = admin.runCommand({ replSetGetStatus: 1 });
} catch (error) {
  status = { ok: 0, codeName: error.codeName, errmsg: error.message };
}
if (status.ok === 1) {
  print(`replica set ${status.set} already initiated`);
} else if (status.codeName === "NotYetInitialized") {
  try {
    admin.runCommand({
      replSetInitiate: { _id: replicaSet, members: [{ _id: 0, host: memberHost }] },
    });
  } catch (error) {
    print(`replSetInitiate failed: ${error.codeName}: ${error.message}`);
    quit(1);
  }
  print(`initiated replica set ${replicaSet} with member ${memberHost}`);
} else {
  print(`replSetGetStatus failed: ${status.codeName}: ${status.errmsg}`);
  quit(1);
}

const deadline = Date.now() + 60 * 1000;
while (!admin.runCommand({ hello: 1 }).isWritablePrimary) {
  if (Date.now() > deadline) {
    print("no writable primary after 60 s");
    quit(1);
  }
  sleep(500);
}
print("writable primary ready");
