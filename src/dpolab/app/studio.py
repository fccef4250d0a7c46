"""dpolab studio: the whole workflow in the browser (`dpolab app` serves it). Streamlit multipage navigation over
views/; each page is UI over the library, and everything long runs as a background job (`dpolab.jobs`), so it outlives
the tab and every tab sees it. Options arrive after `--` as for the chat page (see common.parse_args)."""

from __future__ import annotations

import streamlit as st

from dpolab.app.common import ICON, PAGES, PAGES_DIR, studio_args


def main() -> None:
    args = studio_args()
    default = "chat.py" if args.model or args.compare else "runs.py"  # `dpolab app MODEL` opens on its chat
    pages = [st.Page(str(PAGES_DIR / file), title=title, default=file == default) for file, title in PAGES]
    current = st.navigation(pages, position="sidebar")
    # A local file as the icon: a `:material/…:` one would make the browser fetch the favicon from a font host.
    st.set_page_config(page_title=f"{current.title} · dpolab studio", page_icon=str(ICON), layout="wide")
    current.run()


if __name__ == "__main__":  # as Streamlit runs it (and AppTest); importing it runs nothing
    main()
