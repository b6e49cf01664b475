"""Data: released LXMERT file formats, the feature store, sample data, datasets."""
