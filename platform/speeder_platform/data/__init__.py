"""Dataset import: public formats -> the canonical layout of docs/data.md#layout.

    speeder data prepare movielens-100k --out runs/ml100k/data
    speeder data stats runs/ml100k/data

Modules: `raw` (what importers return), `movielens`, `amazon`, `synthetic` (importers: parse only),
`protocol` (k-core, ids, leave-one-out, candidates: pure functions), `prepare` (runs an import and
writes the layout through `speeder_platform.storage`), `stats` (reads a dataset back and summarises it).
"""
