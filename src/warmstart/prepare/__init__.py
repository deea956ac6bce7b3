"""`warmstart prepare`: raw ILSVRC2012 archives (official or Kaggle) -> verified ImageFolder trees."""
