"""What the engine wraps around ``tf.vectorized_map``: quiet conversion errors and the opt-in pfor rules.

Only public TensorFlow API here: the engine imports this module on every
path. hessop's own pfor rules (`hessop.autodiff.pfor`) patch TensorFlow's
private converter registry, so that module is imported only when
``HESSOP_PFOR_RULES=1`` asks for them.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator

import tensorflow as tf

__all__ = ["ENVIRONMENT_VARIABLE", "engine_rules", "quiet_conversion_errors"]

#: Set to "1" to let the engine vectorise blocks with hessop's pfor rules.
ENVIRONMENT_VARIABLE = "HESSOP_PFOR_RULES"


class _DropConversionErrors(logging.Filter):
    """Drops pfor's ERROR records of an op it could not convert and its notes on ops it loops over, nothing else.

    The notes are TensorFlow's own to-dos ("Conv2DBackpropFilter uses a
    while_loop. Fix that!", for per-example gradients of a convolution): the
    result is right, and there is nothing for a user to do about them.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if record.module != "pfor":
            return True
        if record.levelno >= logging.ERROR and record.funcName == "_convert_helper":
            return False
        return not record.getMessage().endswith("uses a while_loop. Fix that!")


def engine_rules() -> contextlib.AbstractContextManager[None]:
    """`hessop.autodiff.pfor.pfor_rules` if ``HESSOP_PFOR_RULES=1`` is set (read at each trace), else a no-op.

    Off by default: the rules patch TensorFlow's private converter registry,
    and the default path must survive TensorFlow's upgrades.

    Examples
    --------
    >>> import contextlib
    >>> from hessop.autodiff.vectorize import engine_rules
    >>> isinstance(engine_rules(), contextlib.nullcontext)  # HESSOP_PFOR_RULES not set
    True
    """
    if os.environ.get(ENVIRONMENT_VARIABLE, "0").strip() == "1":
        from hessop.autodiff.pfor import pfor_rules  # the private registry, only when asked for

        return pfor_rules()
    return contextlib.nullcontext()


@contextlib.contextmanager
def quiet_conversion_errors() -> Iterator[None]:
    """Within this block, TensorFlow's logger drops pfor's report of an op it cannot convert.

    pfor logs every op it fails to vectorise at ERROR level (the op's
    NodeDef, its inputs and the stack where it was created: 1,740 lines for
    the first block of Hessian-vector products of a Keras LSTM with 51
    parameters) and then raises. The engine catches that error, loops over
    the block instead and says so in one warning that names the error, so
    the log would only bury that warning. Other records, and pfor's records
    outside this block, pass.

    Examples
    --------
    >>> import tensorflow as tf
    >>> from hessop.autodiff.vectorize import quiet_conversion_errors
    >>> with quiet_conversion_errors():
    ...     rows = tf.vectorized_map(lambda v: 2 * v, tf.ones((4, 3)))
    >>> rows.shape
    TensorShape([4, 3])
    """
    logger = tf.get_logger()
    drop = _DropConversionErrors()
    logger.addFilter(drop)
    try:
        yield
    finally:
        logger.removeFilter(drop)
