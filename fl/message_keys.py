"""Message keys shared by the ServerApp and the ClientApp (constants, never literals at the call site)."""

ARRAYS = "arrays"  # ArrayRecord with the model payload (FedAvg's arrayrecord_key)
CONFIG = "config"  # ConfigRecord sent with train/evaluate messages
METRICS = "metrics"  # MetricRecord in replies
NUM_EXAMPLES = "num-examples"  # weighting key, as in Flower's strategies
SERVER_ROUND = "server-round"
PARTITION_ID = "partition-id"  # node_config key set by Flower's simulation and by --node-config
NUM_PARTITIONS = "num-partitions"
CODEC = "codec"  # name of the codec the sender used for ARRAYS
QUERY_PARTITION = "query.partition"  # message type asking a node which partition it holds
UP_CODEC = "up-codec"  # codec the server asks the client to encode its reply with
LR = "lr"
EPOCHS = "epochs"
BATCH_SIZE = "batch-size"
MOMENTUM = "momentum"
WEIGHT_DECAY = "weight-decay"
BN_STATS = "bn-stats"
