"""The AgileNN federated protocol (Huang and Gao, MobiCom 2022, run federated by
``strategies.agilenn`` and ``clients.agilenn_trainer``): the message keys both sides read.

The message config names the phase (``PHASE``): ``pretrain``, ``agile`` or ``split`` (one exchange
of split learning: gradients for the previous batch in, the next batch's coded remote features,
local logits, labels and w out; see ``clients.agilenn_trainer``).
"""

NAME = "agilenn"
PHASE, SELECT, RHO, LAMBDA, PROBE = "agilenn.phase", "agilenn.select", "agilenn.rho", "agilenn.lambda", "agilenn.probe"
STEP, GRAD_VALUES = "agilenn.step", "agilenn.grad-values"
PRETRAIN, AGILE, SPLIT = "pretrain", "agile", "split"
COUNT_PREFIX, CENTROID_PREFIX = "agilenn.count.", "agilenn.centroid."
LAST = "agilenn.last"  # reply metric of a split forward: 1 when this was the client's last batch
DONE = "agilenn.done"  # reply metric of the final split upload
# split-learning array names
LOCAL, LABELS, ALPHA_W = "local", "labels", "alpha_w"
GRAD_FEATURES, GRAD_LOCAL, GRAD_ALPHA = "grad.features", "grad.local", "grad.alpha_w"
