"""ASAG: Adaptive Sparse Anchor Generation (Fu et al., ICCV 2023), spec ``specs/asag.md``.

Query and decoder heads (this package's lower half):

* :mod:`.box_encoding`   xyzr <-> cxcywh / xyxy and the sine encoding of xyzr.
* :mod:`.iof_attention`  AdaMixer-style self-attention with the learnable IoF log-bias and the
  padded-query mask.
* :mod:`.towers`         activation, MLP and Linear-LN-act towers shared by the heads.
* :mod:`.relation_block` RoIAlign content queries + one self-attention layer + proposals (``rpn``).
* :mod:`.sampling_3d`, :mod:`.adaptive_mixing`, :mod:`.adamixer`  the AdaMixer stage (ASAG-A).
* :mod:`.sparse_stage`   the Sparse R-CNN stage (ASAG-S), built on ``models/sparse_rcnn/head.py``.
* :mod:`.deformable_stage` one Deformable-DETR decoder layer (ASAG-D, spec §3.3 reconstruction), built
  on ``layers/deformable_transformer.py``; its neck is ``models/backbones/deformable_encoder.py``.
* :mod:`.decoder`        four parallel one-layer heads with per-head embeddings.
"""
