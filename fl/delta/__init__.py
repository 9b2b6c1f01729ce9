"""DELTA networks (Wang and Nirjon, XDELTA: "Explaining the Difference Between Edge Models and
High-Accuracy Base Models for Vision Tasks"), shared by the DELTA-factorized strategy
(strategies/delta.py, clients/delta_trainer.py) and the XDelta explanation plugin.

    network.py    DeltaArch, DeltaNet (subgraph + SE with skip + GAP + linear), FusedDelta
                  (E + DELTA + resizer + adapter + the base classifier), width tiers as nested
                  prefix blocks, the FNC and group-lasso losses
    pair.py       the edge/base pair, trained centrally on a server split and cached by hash
    extract.py    structured subgraph extraction from the base (learned sparsity over candidate
                  rates, l2 masks, torch-pruning, fine-tuning, truncation, BN folding)
    construct.py  the whole central pipeline, DELTA training, the KD baseline and the report
    slices.py     what a DELTA-factorized round sends each way (channel-slice codec layouts)
    models.py     zoo entries ``delta_fused`` and ``pretrained`` (model=delta / pair_base / pair_edge)
    pretrain.py   ``python -m fl.delta.pretrain``: the central step alone, with its report
"""
