"""Invitations service: a member invites a friend by email; the friend's signup accepts it.

Consumes (queue ``invitations.signups``):
- ``user.signed_up``: records the user in the users projection (so an existing user's
  email cannot be invited) and, with an ``invite_token``, claims and accepts the invite.

Publishes (through the outbox, in the transaction that accepts the invite):
- ``invitation.accepted`` {invitation_id, email, invited_by|null, accepted_user_id},
  once per accepted invitation.

HTTP API (bearer JWT except verify; errors are ``{"error": code, "message": text}``):
- ``POST /invitations`` create, ``GET /invitations`` list (admins: all; others: their own),
  ``DELETE /invitations/{id}`` revoke, ``POST /invitations/{id}/resend`` (admin),
  ``GET /invitations/verify/{token}`` (public). A request body over
  ``GRANTWIRE_MAX_HTTP_BODY_BYTES`` (64 KiB) is 413 before anything else; list pages are
  1..200 (``limit``).
"""

SERVICE = "invitations"
