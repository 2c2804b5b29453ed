"""Command-line tools that build, inspect and enrich webdataset shards (`python -m data_tools.NAME`)."""
