"""Plugins shipped with the simulator (``plugins=[name,...]``). Each module registers its plugin
when imported; the names are only declared here, so a run imports just the plugins it uses.
AgileNN's split network is declared the same way as ``model=agilenn``."""

from fl.hooks import PLUGINS
from fl.models import MODELS

MODELS.declare("agilenn", "plugins.agilenn.network")

for _name in ("agilenn", "compression", "geometry", "update_norms", "xdelta"):
    PLUGINS.declare(_name, f"plugins.{_name}")
