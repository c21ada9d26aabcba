"""Running a saved model on images: pictures of detections (`visualization`)."""
