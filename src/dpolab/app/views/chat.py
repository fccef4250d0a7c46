"""Chat: the streaming chat page (`dpolab.app.page`), base-vs-tuned or any two runs side by side."""

from dpolab.app.page import main

main()
