"""Checks for values read from files someone may have sent (checkpoints, shards' metadata): plain predicates, so
each reader words its own one-line error."""


def whole_number(v, least: int = 0) -> bool:
    """An int (not a bool, not a float that happens to be whole) of at least `least`."""
    return type(v) is int and v >= least
