"""The Streamlit app: ``Home.py`` and ``pages/``, thin over :mod:`sparkops.ui`; shipped
inside the package so an install can serve it (``sparkops up``)."""
