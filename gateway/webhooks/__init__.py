"""Signed outcome webhooks to the site's backend: the Standard Webhooks format and the delivery worker."""
