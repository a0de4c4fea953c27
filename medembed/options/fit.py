from medembed.scorers.options import *  # noqa: F403  TEMPORARY shim until cli/ is switched
from medembed.scorers.options import AUTO_LEVEL, HEAD_NAMES, TOKEN_HEADS, FitOptions, check_level_head  # noqa: F401
