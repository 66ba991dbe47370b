"""`vlpet features inspect` and `convert`: what a feature store holds, image or video, packed file or folder, and
which ids an annotation file names that it lacks; and an image store copied into the other layout."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

from vlpet_cli.features.hdf5 import missing_ids
from vlpet_cli.features.kinds import IMAGE, feature_kind, open_store


def inspect_features(path: Path, wanted: Iterable[str] | None = None, annotations: Path | None = None) -> dict:
    """Summary of a store: layout, kind, count, attributes and the kind's own figures (images: shape and dtype;
    videos: dim, dtype and the frame-count range); with the ids an annotation file names, the ids it lacks."""
    store = open_store(Path(path))
    with store:
        info: dict[str, Any] = {"path": str(store.path), "layout": store.layout, "kind": store.kind,
                                "count": len(store), **store.summary()}
        if wanted is not None:
            wanted = list(wanted)
            missing = missing_ids(store, wanted)
            info.update(annotations=str(annotations), annotation_ids=len(wanted),
                        missing_count=len(missing), missing_ids=missing)
    return info


def describe_features(info: dict, show_missing: int = 10) -> str:
    """Human-readable lines for an inspect_features() result."""
    kind = feature_kind(info["kind"])
    noun = kind.name + "s"
    lines = [f"{info['path']}  ({info['layout']}, {kind.name})", f"  {noun + ':':<11} {info['count']}",
             *kind.stores["packed"].describe(info)]
    for key, value in sorted((info.get("attributes") or {}).items()):
        lines.append(f"  {key + ':':<11} {value}")
    if "annotation_ids" in info:
        lines.append(f"  annotations: {info['annotations']} names {info['annotation_ids']} {noun}, "
                     f"{info['missing_count']} without features")
        for item_id in info["missing_ids"][:show_missing]:
            lines.append(f"    missing: {item_id}")
        if info["missing_count"] > show_missing:
            lines.append(f"    ... and {info['missing_count'] - show_missing} more")
    return "\n".join(lines)


def convert_features(src: Path, dst: Path, layout: str, batch_size: int = 256) -> int:
    """Copy an image store into `layout` at `dst` (resumable: ids already in dst are skipped); returns ids written."""
    store = IMAGE.open(src)
    attrs = {k: v for k, v in store.attrs.items() if k != "dtype"}
    with store, IMAGE.writer(dst, layout, store.shape, store.dtype or "float16", attrs) as writer:
        todo = [i for i in store.ids() if i not in writer.existing()]
        for start in range(0, len(todo), batch_size):
            chunk = todo[start:start + batch_size]
            writer.write(chunk, [store.get(i) for i in chunk])
    return len(todo)
