"""dist_tp: sequential recommenders with transferrable parameters for tail and new users."""

__version__ = "0.1.0"
