"""mkdocs-gallery settings that mkdocs.yml cannot express (read by the `gallery` plugin).

The tutorials run one after another in the mkdocs process, so each starts
from a clean Keras and matplotlib state, and figures are saved with a tight
bounding box (labels outside the axes are not cut off).
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

# absl binds its log handler to sys.stderr on import. Imported here, that is
# the real stderr, not the gallery's capture (which absl would try to close
# at exit).
import absl.logging  # noqa: F401


def _reset(gallery_conf: dict, file: object) -> None:
    import keras
    import matplotlib

    keras.config.set_floatx("float32")
    keras.backend.clear_session()
    # After matplotlib's own reset: the captured figures keep their axis labels.
    matplotlib.rcParams["savefig.bbox"] = "tight"


conf = {"reset_modules": ("matplotlib", _reset)}
