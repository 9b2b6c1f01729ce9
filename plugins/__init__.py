"""Plugins shipped with the simulator; each registers itself by name (``plugins=[name,...]``)."""

from plugins import agilenn  # noqa: F401  (registers "agilenn")
from plugins import compression  # noqa: F401  (registers "compression")
from plugins import geometry  # noqa: F401  (registers "geometry")
from plugins import update_norms  # noqa: F401  (registers "update_norms")
from plugins import xdelta  # noqa: F401  (registers "xdelta")
