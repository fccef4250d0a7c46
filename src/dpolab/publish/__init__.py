"""The publish stage (`dpolab export`, `dpolab push`): a self-contained model folder with its card, to the Hub."""

from dpolab.errors import PublishError  # noqa: F401
from dpolab.publish.export import export_model, is_exported, model_card  # noqa: F401
from dpolab.publish.push import push_model  # noqa: F401
