from lxmert_fast.configuration import LxmertConfig  # noqa
