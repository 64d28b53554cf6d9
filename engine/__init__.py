"""emaki engine: idea -> frame descriptions -> depth-guided SD frame chain -> GIF."""
