"""Old home of the adapter format and atomic writes: re-exports for code not yet moved to `vlpet_cli.artifacts`."""

from vlpet_cli.artifacts import (  # noqa: F401 - re-exports, removed once every caller imports artifacts
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    OBJ_ROWS,
    adapter_state,
    backbone_identity,
    load_adapter,
    load_adapter_state,
    read_adapter_config,
    save_adapter,
)
from vlpet_cli.atomic import atomic_dir, write_json  # noqa: F401 - re-exports
