"""interplab: mechanistic interpretability on Ray with a Parquet/DuckDB activation store."""

__version__ = "0.1.0"
