"""Built-in evaluation methods; importing this package registers them (see :mod:`ppd.eval.registry`).

To add a method, write a module here with a ``@register_method`` function and import it below.
"""

from ppd.eval.methods import agents, clicks, oracle, prompts  # noqa: F401
