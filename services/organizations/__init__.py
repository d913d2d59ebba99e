"""Organizations service: every user gets a workspace once their email is verified.

Consumes (queue ``organizations.users``):
- ``user.signed_up``: records the user in the users projection, then runs
  ``handle_signup_organization`` (nothing happens for an unverified user in ``strict`` mode).
- ``user.email_verified``: marks the user verified, then runs it again. When it arrives
  before the signup, the fact is recorded and the signup provisions the workspace.

Publishes (through the outbox, in the transaction that changes the state):
- ``organization.created`` {organization_id, plan_id}: once, for a new organization;
- ``organization.provisioned`` {user_id, organization_id}: after every successful run,
  again for a user who already has an organization (consumers are idempotent).

HTTP API (errors are ``{"error": code, "message": text}``):
- ``GET /users/{user_id}/organization``: the user's current organization, their role and
  the ``suggested_join`` hint (an older organization with the same email domain); 404
  while the user has none.
"""

SERVICE = "organizations"
