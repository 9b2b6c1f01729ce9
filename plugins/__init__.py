"""Plugins shipped with the simulator; each registers itself by name (``plugins=[name,...]``)."""

from plugins import update_norms  # noqa: F401  (registers "update_norms")
