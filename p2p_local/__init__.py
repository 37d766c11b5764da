"""p2p-local: on-device LLM personalization with Profile-to-PEFT."""

import os as _os

# onnxruntime (1.32) writes a device id and a telemetry database to ~/.cache/Microsoft/DeveloperTools/
# (or $XDG_CACHE_HOME/...) when it loads, even after `disable_telemetry_events()`. Only this variable,
# read by the native library when it is loaded, stops it; so it is set before anything can import it.
_os.environ["ORT_DISABLE_TELEMETRY"] = "1"

__version__ = "0.1.0"
