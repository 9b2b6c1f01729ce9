"""The in-process Grid keeps Flower's Message contract: replies, errors, contexts, timeouts."""

import time

from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fl.engine.inprocess import InProcessGrid
from fl.engine.metered import MeteredGrid
from fl.message_keys import PARTITION_ID
from fl.node_directory import NodeDirectory
from fl.payload import payload_bytes


def _app() -> ClientApp:
    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        if msg.content["config"].get("fail", 0) == context.node_config[PARTITION_ID]:
            raise RuntimeError("boom")
        if msg.content["config"].get("sleep", 0) and context.node_config[PARTITION_ID] == 0:
            time.sleep(float(msg.content["config"]["sleep"]))
        calls = int(context.state["calls"]["n"]) + 1 if "calls" in context.state else 1
        context.state["calls"] = MetricRecord({"n": calls})
        return Message(RecordDict({"metrics": MetricRecord({"partition": context.node_config[PARTITION_ID],
                                                              "calls": calls})}), reply_to=msg)

    return app


def _messages(grid, config):
    content = RecordDict({"config": ConfigRecord(config)})
    return [Message(content, node, "train") for node in grid.get_node_ids()]


def test_replies_in_push_order_with_persistent_context():
    grid = InProcessGrid(_app(), 5, workers=2)
    try:
        for expected_calls in (1, 2):
            replies = list(grid.send_and_receive(_messages(grid, {"fail": -1})))
            assert [int(r.content["metrics"]["partition"]) for r in replies] == [0, 1, 2, 3, 4]
            assert [r.metadata.src_node_id for r in replies] == [1, 2, 3, 4, 5]
            assert all(int(r.content["metrics"]["calls"]) == expected_calls for r in replies)
    finally:
        grid.close()


def test_client_exception_becomes_error_reply():
    grid = InProcessGrid(_app(), 3, workers=2)
    try:
        replies = list(grid.send_and_receive(_messages(grid, {"fail": 1})))
        assert [r.has_error() for r in replies] == [False, True, False]
        assert "boom" in replies[1].error.reason
    finally:
        grid.close()


def test_timeout_returns_what_arrived():
    grid = InProcessGrid(_app(), 3, workers=3)
    try:
        replies = list(grid.send_and_receive(_messages(grid, {"fail": -1, "sleep": 1.0}), timeout=0.3))
        assert sorted(r.metadata.src_node_id for r in replies) == [2, 3]
    finally:
        grid.close()


def test_directory_and_metering():
    grid = MeteredGrid(InProcessGrid(_app(), 4, workers=2))
    try:
        directory = NodeDirectory.discover(grid)
        assert directory.node_of_partition == {0: 1, 1: 2, 2: 3, 3: 4}
        messages = _messages(grid, {"fail": 2})
        replies = list(grid.send_and_receive(messages))
        traffic = grid.close_round()
        assert traffic.down_bytes == 4 * payload_bytes(messages[0].content)
        assert traffic.up_bytes == sum(payload_bytes(r.content) for r in replies if not r.has_error())
        assert traffic.clients == 3 and traffic.failures == 1
        assert grid.close_round().up_bytes == 0
    finally:
        grid.inner.close()
