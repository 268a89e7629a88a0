"""Placeholder: being written (DeepSpeed JSON builder and pre-launch checks)."""


def validate_static(cfg) -> None:
    return None
