"""Typed query functions that take a :class:`sqlalchemy.orm.Session`. No SQL lives in servers/."""
