"""nbgrader's course configuration: this folder is the course root (source/, release/, submitted/, autograded/)."""
c = get_config()  # noqa: F821 (nbgrader provides it)
c.CourseDirectory.root = "."
c.CourseDirectory.course_id = "prune_lab"
c.Execute.timeout = 600  # seconds per cell while autograding (the first cell may train the demo model)
