"""Scores and error analysis: the metrics and tables evaluate writes (scoring), and what
render-errors builds from them: nearest training images (neighbours), per-error records
(tables), annotated sheets (sheets) and the error page (page)."""
