"""Billing: the credits ledger of every organization, and the referral grants.

Consumes (queue ``billing.grants``):
- ``invitation.accepted`` -> record the referral, then ``grant_for_invitation``;
- ``organization.provisioned`` -> record user -> organization, then grant every open
  referral where that user is the referee or the referrer;
- ``organization.created`` -> the plan's signup grant, once (``signup_grant:<org>``).

Publishes, through the outbox in the grant's own transaction:
- ``billing.credits_granted`` {organization_id, ref_id, source, amount, balance,
  expires_at, invitation_id, side}.

HTTP (``api.py``; bearer JWT, members of the organization or admins):
``GET /organizations/{id}/balance``, ``GET /organizations/{id}/ledger?limit=&cursor=``;
``/healthz``, ``/readyz``, ``/metrics``.

Jobs (``grantwire reconcile | expire | audit``, see ``jobs.py``). Configuration: ``settings.py``.
Design notes and operations: ``README.md`` in this folder.
"""

SERVICE = "billing"
