"""``qkvtune bench claims`` (placeholder, being written)."""


def register(sub) -> None:
    p = sub.add_parser("claims", help="reproduce the papers' claims (not yet written)")
    p.set_defaults(func=lambda args: 1)
