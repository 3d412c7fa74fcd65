"""Send a few tasks to the example app."""

from tasks import charge, refund, ship

for i in range(10):
    charge.delay(i)
    ship.delay(i)
refund.delay(42)
print("sent 21 tasks")
