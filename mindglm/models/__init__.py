"""Model families. Each family module provides `build_network(config)`,
`prepare_positions(config, input_ids, attention_mask, position_ids)`, `POSITION_STEP` and
`position_rule(config)` (how generated tokens' positions follow, None for the plain step)."""
from mindglm.models import glm, glm2
from mindglm.runtime import launch_from_host_thread_on_cpu

# every path that builds a network imports this package before MindSpore runs anything
launch_from_host_thread_on_cpu()


def family_module(config):
    """The module implementing `config.family`."""
    return glm if config.family == "chatglm" else glm2
