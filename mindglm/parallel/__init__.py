"""Tensor parallelism: one model over the devices of an msrun launch.

    model = mindglm.load_model("chatglm3-6b", tensor_parallel=2)   # in every msrun worker

context.py joins the ranks (light: no MindSpore import until init), sharding.py decides each
rank's slices (the rewrite), layers.py holds the cells that carry the collectives, lockstep.py
lets front ends drive every rank from rank 0.
"""
