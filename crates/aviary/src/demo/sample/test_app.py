#!/usr/bin/env python3
"""The sample service's tests, run by script/cibuild."""
import unittest

import app


class AppTest(unittest.TestCase):
    def test_name(self):
        self.assertEqual(app.NAME, "hello-aviary")

    def test_healthy_by_default(self):
        self.assertTrue(app.healthy())


if __name__ == "__main__":
    unittest.main()
