import pytest

from fl.engine.inprocess import identify_as_server


@pytest.fixture(autouse=True)
def _flower_task_identity():
    """Flower Messages need a process-wide task identity; the engines set it, unit tests here."""
    identify_as_server(1)
