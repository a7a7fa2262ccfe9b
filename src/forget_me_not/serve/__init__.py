"""`fmn serve`: a web page over the same API (forget a concept, see the before/after grid with the
judge's scores, download the patch, open earlier reports)."""
