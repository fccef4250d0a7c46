"""The chat app: `dpolab app [MODEL] [--compare BASE]` serves `page.py` with Streamlit (launched by `launch.py`).

The page is UI only; prompts, generation and model resolution come from `dpolab.generation`, `dpolab.folders.run` and
`dpolab.models`, exactly as evaluation uses them.
"""

from dpolab.app.launch import PAGE, run_app, streamlit_command

__all__ = ["PAGE", "run_app", "streamlit_command"]
