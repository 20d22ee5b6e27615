"""``qkvtune bench speed`` (placeholder, being written)."""


def register(sub) -> None:
    p = sub.add_parser("speed", help="step time, tokens/s and peak memory against PEFT (not yet written)")
    p.set_defaults(func=lambda args: 1)
