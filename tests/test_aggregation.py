"""FedAvg's aggregation on hand-computed two-client cases."""

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from fl.message_keys import ARRAYS, METRICS, NUM_EXAMPLES
from strategies import FedAvg, weighted_mean


def test_weighted_mean_by_hand():
    a = {"w": torch.tensor([1.0, 2.0]), "n": torch.tensor(4)}
    b = {"w": torch.tensor([4.0, 8.0]), "n": torch.tensor(10)}
    out = weighted_mean([a, b], [1.0, 3.0])
    assert torch.allclose(out["w"], torch.tensor([3.25, 6.5]))
    assert out["n"].dtype == torch.int64 and int(out["n"]) == 8  # round(0.25*4 + 0.75*10) = round(8.5) = 8


def _reply(node: int, w: float, n: int, msg: Message) -> Message:
    content = RecordDict({ARRAYS: ArrayRecord({"w": torch.full((3,), w)}), METRICS: MetricRecord({NUM_EXAMPLES: n, "train_loss": w})})
    reply = Message(content, reply_to=msg)
    reply.metadata.__dict__["_src_node_id"] = node
    return reply


def _instruction(node: int) -> Message:
    msg = Message(RecordDict({"config": ConfigRecord()}), node, "train")
    msg.metadata.__dict__["_message_id"] = f"m{node}"
    return msg


def test_fedavg_aggregate_train_two_clients():
    strategy = FedAvg(fraction_train=1.0, min_train_nodes=1, min_available_nodes=1)
    strategy.reference = {"w": torch.zeros(3)}
    replies = [_reply(1, 1.0, 10, _instruction(1)), _reply(2, 5.0, 30, _instruction(2))]
    arrays, metrics = strategy.aggregate_train(1, replies)
    assert torch.allclose(arrays.to_torch_state_dict()["w"], torch.full((3,), 4.0))  # (10*1 + 30*5) / 40
    assert abs(metrics["train_loss"] - 4.0) < 1e-9


def test_fedavg_result_independent_of_reply_order():
    strategy = FedAvg(fraction_train=1.0, min_train_nodes=1, min_available_nodes=1)
    strategy.reference = {"w": torch.zeros(3)}
    vals = [(i, 0.1 * i + 1e-7 * i * i, 7 + i) for i in range(1, 9)]
    fwd = strategy.aggregate_train(1, [_reply(i, w, n, _instruction(i)) for i, w, n in vals])[0]
    rev = strategy.aggregate_train(1, [_reply(i, w, n, _instruction(i)) for i, w, n in vals[::-1]])[0]
    assert torch.equal(fwd.to_torch_state_dict()["w"], rev.to_torch_state_dict()["w"])
