// Grantwire MongoDB users: one per service with readWrite on its OWN database only, and
// `grantwire-ops` with a custom role limited to the dead-letter archive collections.
//
// Compose: mounted into /docker-entrypoint-initdb.d/ of the official mongo image, which runs it
// once, on an empty data volume, against a temporary local mongod without auth; passwords come
// from MONGO_INITDB_*_PASSWORD (the entrypoint unsets every MONGO_INITDB_* variable before
// starting the real mongod).
// Elsewhere (idempotent: creates or updates), as a user with userAdmin on admin:
//   MONGO_INITDB_ORGANIZATIONS_PASSWORD=... MONGO_INITDB_INVITATIONS_PASSWORD=... \
//   MONGO_INITDB_BILLING_PASSWORD=... MONGO_INITDB_GRANTWIRE_OPS_PASSWORD=... \
//   mongosh "mongodb://<admin>@<host>/?authSource=admin&replicaSet=rs0&tls=true" \
//     --file deploy/mongo/initdb.d/10-grantwire-users.js
// Users live in the admin database: connection strings use authSource=admin.

const SERVICES = {
  organizations: "grantwire_organizations",
  invitations: "grantwire_invitations",
  billing: "grantwire_billing",
};
const DEAD_LETTER_ROLE = "grantwireDeadLetterOperator";

const admin = db.getSiblingDB("admin");

function requiredEnv(name) {
  const value = process.env[name];
  if (!value) {
    throw new Error(`${name} is not set: refusing to create a user without a password`);
  }
  return value;
}

function upsertUser(name, pwd, roles) {
  if (admin.getUser(name)) {
    admin.updateUser(name, { pwd, roles });
    print(`updated user ${name}`);
  } else {
    admin.createUser({ user: name, pwd, roles });
    print(`created user ${name}`);
  }
}

function upsertRole(role, privileges) {
  if (admin.getRole(role)) {
    admin.updateRole(role, { privileges, roles: [] });
    print(`updated role ${role}`);
  } else {
    admin.createRole({ role, privileges, roles: [] });
    print(`created role ${role}`);
  }
}

// readWrite covers what a service does in its database: CRUD, transactions, index builds (TTL
// indexes included) and change streams on its own collections (the outbox relay watches one).
for (const [service, database] of Object.entries(SERVICES)) {
  const password = requiredEnv(`MONGO_INITDB_${service.toUpperCase()}_PASSWORD`);
  upsertUser(service, password, [{ role: "readWrite", db: database }]);
}

// `grantwire dlq list|show|replay|purge` reads and updates each service's `dead_letters`
// collection and appends to `dead_letter_audit`; nothing else (no deletes, no other collections).
const privileges = [];
for (const database of Object.values(SERVICES)) {
  privileges.push({
    resource: { db: database, collection: "dead_letters" },
    actions: ["find", "update"],
  });
  privileges.push({
    resource: { db: database, collection: "dead_letter_audit" },
    actions: ["find", "insert"],
  });
}
upsertRole(DEAD_LETTER_ROLE, privileges);
upsertUser("grantwire-ops", requiredEnv("MONGO_INITDB_GRANTWIRE_OPS_PASSWORD"), [
  { role: DEAD_LETTER_ROLE, db: "admin" },
]);
