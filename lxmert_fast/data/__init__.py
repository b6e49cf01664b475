"""Data: released LXMERT file formats, the feature store, sample data, datasets.

    formats.py          feature TSV reader / writer, pre-training JSON reader, all_ans.json and normalize_answer
    feature_store.py    one-off TSV -> memory-mapped fp16 store conversion, FeatureStore to read it, index_images
                        over several stores
    tokenizer.py        load_tokenizer (folder or hub name) and check_tokenizer (a real vocabulary for the data)
    pretrain_dataset.py PretrainDataset (the five pre-training tasks' inputs / labels) and pretrain_collate
    pretrain_batch.py   the compact batch (each value once) and pretrain_inputs, which expands it on the device
    sample.py           ensure_sample_data: a small learnable data set in the released formats + a WordPiece vocab
    fsutil.py           atomic directory publishing and build locks

Typical use (the default pre-training run):

    paths = ensure_sample_data("runs/sample_data", feat_dim=2048)
    store = FeatureStore.from_tsv(paths.features_tsv)            # converts once, then re-uses
    table = AnswerTable(paths.answer_table)
    ds = PretrainDataset(paths.train_json, [store], table, paths.tokenizer_dir, max_seq_length=20, seed=9595)
    loader = DataLoader(ds, batch_size=32, sampler=..., num_workers=2, collate_fn=pretrain_collate)
    for epoch in range(epochs):
        ds.set_epoch(epoch)                                      # before the epoch's iterator is created
        for batch in loader:
            loss = model(**batch).loss                           # transformers LxmertForPreTraining kwargs
"""

# where each public name lives; imported on first use, so that `python -m lxmert_fast.data.download --help` (and any
# light user of one module) does not load torch through this package
_HOMES = {
    "feature_store": ("FeatureStore", "StoreError", "convert_tsv", "default_store_dir", "index_images"),
    "formats": ("AnnotationFormatError", "AnswerTable", "FeatureFormatError", "ImageFeatures", "make_uid",
                "normalize_answer", "read_feature_tsv", "read_pretrain_json", "write_feature_tsv"),
    "pretrain_batch": ("CompactBatch", "pretrain_inputs"),
    "pretrain_dataset": ("IGNORE_INDEX", "PretrainDataset", "compact_pretrain_collate", "pretrain_collate",
                         "to_device"),
    "sample": ("ATTRIBUTE_NAMES", "OBJECT_NAMES", "SamplePaths", "build_wordpiece_vocab", "ensure_sample_data",
               "make_sample_data"),
    "tokenizer": ("TokenizerError", "check_tokenizer", "load_tokenizer"),
}
_HOME_OF = {name: module for module, names in _HOMES.items() for name in names}

__all__ = [
    "ATTRIBUTE_NAMES",
    "IGNORE_INDEX",
    "OBJECT_NAMES",
    "AnnotationFormatError",
    "AnswerTable",
    "CompactBatch",
    "FeatureFormatError",
    "FeatureStore",
    "ImageFeatures",
    "PretrainDataset",
    "SamplePaths",
    "StoreError",
    "TokenizerError",
    "build_wordpiece_vocab",
    "check_tokenizer",
    "compact_pretrain_collate",
    "convert_tsv",
    "default_store_dir",
    "ensure_sample_data",
    "index_images",
    "load_tokenizer",
    "make_sample_data",
    "make_uid",
    "normalize_answer",
    "pretrain_collate",
    "pretrain_inputs",
    "to_device",
    "read_feature_tsv",
    "read_pretrain_json",
    "write_feature_tsv",
]


def __getattr__(name):
    if name not in _HOME_OF:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(f"{__name__}.{_HOME_OF[name]}"), name)
