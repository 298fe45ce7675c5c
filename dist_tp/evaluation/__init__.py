"""Full-ranking evaluation (HR/NDCG by user group) and recommendations from a saved run."""
