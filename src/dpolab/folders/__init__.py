"""The on-disk layouts, each owned by one module: a prepared-data folder (`prepared`), a run folder (`run`), a sweep
folder (`sweep`), and the marker that says dpolab created a folder (`owner`). Everyone else reads and writes
through these; no other module spells a file name of these layouts."""
