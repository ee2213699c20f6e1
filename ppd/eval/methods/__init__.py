"""Built-in evaluation methods; importing this package registers them (see :mod:`ppd.eval.registry`).

To add a method, write a module here with a ``@register_method`` function and import it below.
"""

from ppd.eval.methods import (  # noqa: F401
    agents,
    clicks,
    gf_sam,  # GF-SAM-style training-free row (issue 24)
    oracle,
    prompts,
    proxy_prompt,  # Proxy Prompt baseline rows
    sampo,  # SAMPO baseline rows
)
