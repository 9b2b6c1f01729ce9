import logging

import pytest
import torch

from fl.engine.inprocess import identify_as_server


@pytest.fixture(autouse=True)
def _flower_task_identity():
    """Flower Messages need a process-wide task identity; the engines set it, unit tests here."""
    identify_as_server(1)


@pytest.fixture(scope="module")
def one_torch_thread():
    """One intra-op thread for a test module of small models (``pytestmark = usefixtures(...)``):
    tiny batches gain nothing from threads, and spinning threads stall on a busy machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def _no_logging_to_closed_streams():
    """A test that runs ``fl.simulate`` in this process leaves Hydra's log handlers on the streams
    pytest captured for it, closed once it ends; a later test's log lines would then print
    ``--- Logging error ---`` tracebacks. Drop such handlers before each test."""
    loggers = [logging.getLogger(), *(obj for obj in logging.Logger.manager.loggerDict.values()
                                      if isinstance(obj, logging.Logger))]
    for logger in loggers:
        for handler in list(logger.handlers):
            if getattr(getattr(handler, "stream", None), "closed", False):
                logger.removeHandler(handler)
