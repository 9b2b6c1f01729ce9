"""Plugins shipped with the simulator (``plugins=[name,...]``). Each module registers its plugin
when imported; the names are only declared here, so a run imports just the plugins it uses."""

from fl.hooks import PLUGINS

for _name in ("agilenn", "compression", "geometry", "update_norms", "xdelta"):
    PLUGINS.declare(_name, f"plugins.{_name}")
