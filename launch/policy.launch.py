"""Start the vla_runtime policy node: `ros2 launch vla_runtime policy.launch.py [checkpoint:=DIR] ...`.

Written to the launch / launch_ros API of ROS 2 Jazzy. The parameters file (default: this package's
config/policy.yaml) is applied first; every node parameter is also a launch argument, and only the
arguments given on the command line override the file (an argument left out keeps the file's value).
The arguments are generated from the node's one parameter table (vla_runtime.nodes.params).
"""

import os

from ament_index_python.packages import get_package_share_directory
from launch.actions import DeclareLaunchArgument, OpaqueFunction
from launch.substitutions import LaunchConfiguration
from launch_ros.actions import Node
from vla_runtime.nodes.params import PARAMS, launch_overrides

from launch import LaunchDescription


def policy_node(context):
    given = {p.name: LaunchConfiguration(p.name).perform(context) for p in PARAMS}
    return [
        Node(
            package="vla_runtime",
            executable="policy_node",
            name="policy_node",
            namespace=LaunchConfiguration("namespace"),
            output="screen",
            emulate_tty=True,
            parameters=[LaunchConfiguration("params_file"), launch_overrides(given)],
        )
    ]


def generate_launch_description():
    default_params = os.path.join(get_package_share_directory("vla_runtime"), "config", "policy.yaml")
    arguments = [
        DeclareLaunchArgument(
            "namespace", default_value="", description="Namespace of the node and its topics"
        ),
        DeclareLaunchArgument("params_file", default_value=default_params, description="Parameters YAML"),
    ] + [
        DeclareLaunchArgument(p.name, default_value="", description=f"{p.description} (default: the file's)")
        for p in PARAMS
    ]
    return LaunchDescription([*arguments, OpaqueFunction(function=policy_node)])
